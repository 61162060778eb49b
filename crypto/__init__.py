"""seedswarm.crypto"""
