from promethean.cli import main

main()
