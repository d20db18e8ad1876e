"""python cli.py fit|validate|test|predict --config configs/<experiment>.yaml"""

from seg.train.cli import main

if __name__ == "__main__":
    main()
