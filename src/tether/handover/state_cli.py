"""tether-state: look inside a migration stream, or check that it is valid.

    tether-state inspect [--json] FILE|-
    tether-state check FILE|-

Reads tether's streams and passt's, told apart by their magic.  Exit status:
0 valid, 1 invalid stream, 2 usage error or unreadable input.  Never a
traceback: every failure is one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tether.handover.format import FORMATS
from tether.migrate import cli


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, tuple(FORMATS.values()))


if __name__ == "__main__":
    sys.exit(main())
