"""Ships the workflow inside the package: the repository keeps workflow/ (Snakefile, rules, profiles,
schemas) and manifests/schema.json at the top level where users find them; a built wheel carries them
as package data under wsi_pipeline/workflow/ and wsi_pipeline/manifests/ (same relative layout, so the
Snakefile's `../manifests/schema.json` resolves in both). `stages.run.workflow_dir()` finds them
there, or in the checkout when run from a source tree. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# (source in the repository, destination inside the wsi_pipeline package)
SHIPPED = [("workflow", "workflow"), ("manifests/schema.json", "manifests/schema.json"),
           ("configs/volumes_demo.yaml", "configs/volumes_demo.yaml")]   # wsi-pipeline demo-volumes


class BuildPyWithWorkflow(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's files in place
            return
        target = Path(self.build_lib) / "wsi_pipeline"
        for source, dest in SHIPPED:
            src = HERE / source
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*")
                                                       if p.is_file() and "__pycache__" not in p.parts)
            for f in files:
                out = target / dest / f.relative_to(src) if src.is_dir() else target / dest
                out.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(f), str(out))


setup(cmdclass={"build_py": BuildPyWithWorkflow})
