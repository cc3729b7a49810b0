from nodemesh.cli.main import main

main()
