"""SimMIM pretraining, the reference's entry point: ``python main_simmim_pt.py --cfg FILE --data-path IMAGES``.

It is :mod:`main` with ``TRAIN.OBJECTIVE simmim`` (masked image modelling; labels unused); every flag of
``main.py`` works the same way.
"""
import sys
from typing import List, Optional

import main
from utils import exit_process


def simmim_argv(argv: List[str]) -> List[str]:
    """``argv`` with ``TRAIN.OBJECTIVE simmim`` added to ``--opts`` (ahead of the user's own overrides)."""
    if "--opts" in argv:
        at = argv.index("--opts") + 1
        return argv[:at] + ["TRAIN.OBJECTIVE", "simmim"] + argv[at:]
    return argv + ["--opts", "TRAIN.OBJECTIVE", "simmim"]


def cli(argv: Optional[List[str]] = None) -> int:
    return main.cli(simmim_argv(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    exit_process(cli())
