from slt.cli import main

main()
