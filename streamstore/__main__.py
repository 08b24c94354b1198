import sys

from streamstore.cli import main

sys.exit(main())
