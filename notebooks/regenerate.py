"""Execute multi_style_fusion.ipynb top to bottom and save it with its outputs (the images the repository shows).

Usage: python notebooks/regenerate.py        (offline, on the shapes world; under a minute on a CPU)
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

PATH = Path(__file__).with_name("multi_style_fusion.ipynb")


def main() -> None:
    notebook = nbformat.read(PATH, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(PATH.parent)}}).execute()
    for cell in notebook.cells:  # execution metadata changes every run; the outputs are what the repository shows
        cell.get("metadata", {}).pop("execution", None)
        if "outputs" in cell:  # progress bars and library warnings on stderr are not part of the story
            cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    nbformat.write(notebook, PATH)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
