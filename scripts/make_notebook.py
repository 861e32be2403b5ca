"""Write a notebook from a compact text form: cells separated by lines '# %%' (code) or '# %% [md]'.

    python scripts/make_notebook.py notebooks/src/quickstart.py notebooks/quickstart.ipynb
"""
import sys

import nbformat


def build(src: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    kind, lines = None, []
    for line in src.splitlines() + ["# %%"]:
        if line.startswith("# %%"):
            if kind is not None and "".join(lines).strip():
                text = "\n".join(lines).strip("\n")
                if kind == "md":
                    text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
                    nb.cells.append(nbformat.v4.new_markdown_cell(text))
                else:
                    nb.cells.append(nbformat.v4.new_code_cell(text))
            kind, lines = ("md" if "[md]" in line else "code"), []
        else:
            lines.append(line)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: rebuilding an unchanged source gives an identical file
    return nb


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    nbformat.write(build(open(src).read()), dst)
