"""bench.tables: markdown tables through tabulate, cells printed exactly as given."""
from bench.tables import markdown_table


def test_markdown_table_keeps_cells_as_given_and_escapes_pipes():
    got = markdown_table(["method", "a|b"], [["dense", "0.00"], ["x", "-"]])
    assert got.split("\n") == ["| method   | a\\|b   |",
                               "|----------|--------|",
                               "| dense    | 0.00   |",
                               "| x        | -      |"]
