from mobiletune.cli import run

run()
