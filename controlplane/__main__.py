"""`python -m nodemesh.controlplane --source sandbox --state-dir DIR | --source kubernetes ...`"""

from nodemesh.controlplane.main import main

main()
