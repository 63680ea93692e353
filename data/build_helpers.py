"""Build and check the data path's C helpers at set-up: ``python -m data.build_helpers`` (``make native``).

Each helper missing from the cache (or all, with ``--rebuild``) is compiled (:mod:`data.native`), then loaded and
checked as a run would load it; one line per helper says where it is and what the set-up found, or why it is not
available. A run never compiles: it loads these builds or falls back (see docs/data.md, "C helpers").
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from data import jpeg_region, resample
from data.native import BuildError, Helper

#: Each helper with the function that loads and checks it in this process (empty: it works).
HELPERS: Tuple[Tuple[Helper, Callable[[], str]], ...] = (
    (jpeg_region.HELPER, jpeg_region.unavailable_reason),
    (resample.HELPER, resample.unavailable_reason),
)


def build_and_check(helper: Helper, unavailable: Callable[[], str], rebuild: bool) -> Tuple[bool, str]:
    """Whether ``helper`` works here after the set-up, and the line that says so."""
    how = "already built"
    if rebuild or not helper.path().exists():
        try:
            how = "built with " + " ".join(helper.build())
        except BuildError as err:
            return False, f"{helper.name}: not built: {err}"
    reason = unavailable()
    if reason:
        return False, f"{helper.name}: not available: {reason}"
    return True, f"{helper.name}: {helper.path()} ({how}), checked"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Always 0: the helpers are optional (``.ci/run``'s ``EFFNET_REQUIRE_NATIVE=1`` makes the tests insist)."""
    parser = argparse.ArgumentParser(prog="python -m data.build_helpers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="compile every helper, even where one is built")
    args = parser.parse_args(argv)
    missing: List[str] = []
    for helper, unavailable in HELPERS:
        works, line = build_and_check(helper, unavailable, args.rebuild)
        print(line, flush=True)
        if not works:
            missing.append(helper.name)
    if missing:
        print(f"note: without {', '.join(missing)} the data path falls back to simplejpeg or Pillow (same pixels, "
              "slower); install gcc and libjpeg62-turbo-dev (make jpeg) and rerun make native", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
