"""Print the bad-input matrix's rows by class and outcome: ``python tests/reliability/count_cases.py``.

Classes 4-9 are issue 15's (4 wrong geometry, 5 units, 6 size guards, 7 corruption, 8 foreign
exceptions / raw tracebacks, 9 silent oddities); the others are the kinds of the earlier rows.
Outcome: the error the input is refused with (``CliRefusal``: a CLI exit status and one error line),
or ``accepted`` (handled right: converted, computed in float64, ...).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]

from test_bad_input_matrix import ALL_CASES  # noqa: E402


def _outcome(exc) -> str:
    if exc is None:
        return "accepted"
    names = [e.__name__ for e in (exc if isinstance(exc, tuple) else (exc,))]
    return "refused: " + "/".join(names)


def main() -> int:
    by_class = Counter(c.cls for c in ALL_CASES)
    by_both = Counter((c.cls, _outcome(c.exc)) for c in ALL_CASES)
    order = sorted(by_class, key=lambda k: (not k.isdigit(), k))
    for cls in order:
        print(f"class {cls}: {by_class[cls]}")
        for (c, outcome), n in sorted(by_both.items()):
            if c == cls:
                print(f"    {n:3d}  {outcome}")
    print(f"total: {len(ALL_CASES)} ({sum(by_class[k] for k in '456789')} in classes 4-9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
