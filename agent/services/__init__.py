"""gRPC servicers: translate between proto messages and domain objects.

Nothing here decides anything: validation lives in the drivers, job kinds and
the engine, and the error -> status mapping in agent.errors.
"""
