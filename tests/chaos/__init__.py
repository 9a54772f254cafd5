"""The chaos suite: faults on both sides of the router, on loopback, bounded in time.

`TALLY` gathers what every scenario (and the parsing fuzz) did; the chaos conftest prints it
at the end of the session."""

from router.testing.chaos.tally import Tally

TALLY = Tally()
