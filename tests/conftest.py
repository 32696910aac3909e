"""Root of the test tree: its folder goes on sys.path, so the backend folders share ``testsupport``."""
