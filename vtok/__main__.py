"""``python -m vtok ...``: the same as the ``vtok`` command."""
import sys

from vtok.cli import main

sys.exit(main())
