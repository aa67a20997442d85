from visrl.cli import main

main()
