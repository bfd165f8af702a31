"""Box decoders for ``--decode``: each module is self-contained (numpy only) and shipped to devices as source."""
