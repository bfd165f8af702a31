"""Local services for the simulated fleet, the demo and the tests: a broker, SSH endpoints, agents."""
