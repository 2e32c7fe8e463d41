from ptq.report.cli import main

main()
