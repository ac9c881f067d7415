import sys

from broker.daemon import main

sys.exit(main())
