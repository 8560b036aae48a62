import os

# The suite runs on the eager path; tests that prove compiled == eager call `.compiled` directly.
os.environ.setdefault("SEEDSLOT_COMPILE", "0")
