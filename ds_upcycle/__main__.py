import sys

from ds_upcycle.cli import main

sys.exit(main())
