from lacq.cli import main

main()
