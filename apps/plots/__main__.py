"""python -m apps.plots DUMP_DIR [DUMP_DIR ...] [--out DIR]"""

from apps.plots import main

main()
