"""Save points in other people's formats and places: publishing to git (LFS) and the
Hugging Face Hub (:mod:`savepoints.interop.publish`)."""
