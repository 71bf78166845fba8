from slt._entry import main

main()
