import sys

from supervisor.daemon import main

sys.exit(main())
