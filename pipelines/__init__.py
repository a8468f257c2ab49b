"""nl2sql-pipeline: DVC stages that turn databases and question/SQL pairs into a served NL-to-SQL model."""
