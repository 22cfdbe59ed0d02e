"""The local stack: a Defender API simulator, a managed identity endpoint and an Azurite runner.

Used by the test suite, the benchmarks and `make run`; never deployed (see .funcignore).
"""
