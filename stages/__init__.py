"""Thin DVC stage scripts: read one params group, call dfq, write outputs atomically.

Run as ``python -m stages.<name>``, a stage is a fresh process that first imports torch (about 2 s here): Python's
cyclic garbage collector would scan the few hundred thousand objects those imports make (none of them garbage) many
times over, about 15 % of the import time. So it is off from here until the stage's imports are done
(``stages._common.imports_done``: collection back on, the objects made so far frozen out of its scans). Imported any
other way (tests), nothing changes.
"""

import gc
import sys

if sys.argv[:1] == ["-m"]:  # python -m stages.<name>: argv[0] is "-m" while the package is imported
    gc.disable()
