"""The job engine: every long operation of the agent runs as a job."""
