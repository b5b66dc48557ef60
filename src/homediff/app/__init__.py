"""The application on top: the `homediff` command, the demo and the doctor."""
