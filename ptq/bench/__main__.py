from ptq.bench.quant import main

main()
