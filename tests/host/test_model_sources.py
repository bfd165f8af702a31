"""Model files that are not what their name says: one line naming the file and what to do, before TensorFlow loads."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("content", [b"this is not a zip", b"", b"PK\x03\x04 cut short"])
def test_a_keras_file_that_is_not_a_zip_archive_says_so_not_file_not_found(tmp_path, content):
    """Keras answered a .keras file that is not a zip with "File not found: filepath=..." for a file that exists,
    and edge-kit added advice about custom layers; the line now says what is wrong with the file."""
    from edge_kit.compiler.sources import load_source
    from edge_kit.errors import InputError

    bad = tmp_path / "model.keras"
    bad.write_bytes(content)
    with pytest.raises(InputError) as caught:
        load_source(bad)
    assert str(caught.value) == (f"{bad}: not a loadable Keras model (not a zip archive, as every .keras file is: "
                                 "damaged, cut short, or another format named .keras); save it again with "
                                 "model.save('name.keras')")
    assert caught.value.exit_code == 2
