import sys

from lens_alti.cli import main

sys.exit(main())
