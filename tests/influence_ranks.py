"""``python -m tests.influence_ranks CMD ARGS --next CMD ARGS ...``: several grass-llm commands
in one process per rank, so that one torchrun launch runs them all (under the strict
collectives of ``tests/strict_dist.py``)."""

import sys

from tests import strict_dist

strict_dist.install()

from grass_llm.cli import app  # noqa: E402  (after the patch, on purpose)


def main(argv: list[str]) -> int:
    cmds, cur = [], []
    for a in argv:
        if a == "--next":
            cmds.append(cur)
            cur = []
        else:
            cur.append(a)
    cmds.append(cur)
    for cmd in cmds:
        rc = app(cmd, prog_name="grass-llm", standalone_mode=False)
        if rc:
            return int(rc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
