"""The ``elastic`` command line: parse, call one library function, render. Nothing imports this."""
