"""jobs: ClinicalBERT batch jobs on Ray (spec, corpus, actors, dispatch, output)."""
