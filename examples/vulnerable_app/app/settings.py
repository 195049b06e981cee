"""Configuration with planted fake credentials (AWS's documented example keys).

None of these values is real; they exist so secret_detection has something to find.
"""

AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DATABASE_PASSWORD = "hunter2-not-a-real-password"
GITHUB_TOKEN = "ghp_0123456789abcdefABCDEF0123456789abcd"
DEBUG = True
