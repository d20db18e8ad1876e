"""python cli.py fit|validate|test|predict --config configs/<experiment>.yaml"""

from seg.cli import cli_main

if __name__ == "__main__":
    cli_main()
