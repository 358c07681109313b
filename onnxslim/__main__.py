from onnxslim.cli import main

main()
