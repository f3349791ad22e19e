"""What craken says about a run: the summary before it, progress during it, report and verdict after."""
