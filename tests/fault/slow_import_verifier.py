"""A verifier whose module takes a second to import (a stand-in for a verifier module that imports torch or
sympy), for the test that a worker's start-up does not count against a call's time limit."""

import time

time.sleep(1.0)  # at import, in every worker that unpickles `verify`


def verify(answer: str) -> tuple[float, bool]:
    return (1.0, True) if answer == "2" else (-1.0, False)
