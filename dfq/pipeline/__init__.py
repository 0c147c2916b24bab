"""The pipeline layer: the only code that knows params.yaml's shape (schema, checks), the file layout and stage
names (paths), and what the report and MLflow show (report, plots, runs, tracking)."""
