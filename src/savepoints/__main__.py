from savepoints.cli import main

main()
