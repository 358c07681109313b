"""One module per command of the command line (`onnxslim.cli.COMMANDS` says which), each imported only
when its command runs; `options.py` holds what they share."""
