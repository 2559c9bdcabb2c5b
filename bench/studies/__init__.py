"""Studies behind the method's measured choices (docs/method.md, bench/README.md)."""
