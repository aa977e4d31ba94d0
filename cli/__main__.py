"""`python -m cli`: how `chestaid serve` starts its child processes."""
from cli import main

main()
