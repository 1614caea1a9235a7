"""skysense.losses"""
