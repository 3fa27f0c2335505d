from setuptools import find_packages, setup

package_name = 'habc_policy'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='habc developers',
    maintainer_email='habc@example.org',
    description='Robot-side nodes and policy models of habc.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'sync_node = habc_policy.sync_node:main',
            'policy_node = habc_policy.policy_node:main',
            'teleop_arbiter_node = habc_policy.teleop_arbiter_node:main',
            'episode_recorder_node = habc_policy.episode_recorder_node:main',
            'hold_position_node = habc_policy.hold_position_node:main',
        ],
    },
)
