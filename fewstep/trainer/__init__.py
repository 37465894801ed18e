"""The companion training worker: procedural data, teachers, few-step students, evaluation, push."""
